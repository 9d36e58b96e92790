"""Interop with the real clients (llama.cpp, repeng, steering-vectors) in their own side environments."""
