"""raycollapse.cli"""
