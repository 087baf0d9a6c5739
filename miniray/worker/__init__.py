"""TODO worker"""
