"""
Tests for L{tunnel}.
"""
