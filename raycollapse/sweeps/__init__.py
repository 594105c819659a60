"""raycollapse.sweeps"""
