"""TODO client"""
