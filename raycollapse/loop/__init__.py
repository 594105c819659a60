"""raycollapse.loop"""
