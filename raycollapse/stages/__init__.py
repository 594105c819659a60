"""raycollapse.stages"""
