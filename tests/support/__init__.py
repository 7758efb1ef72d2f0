"""Helpers shared by test modules (real LMs on recording engines, stub servers)."""
