"""TODO values"""
