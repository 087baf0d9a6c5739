"""TODO cluster/ssh"""
