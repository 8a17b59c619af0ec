"""Engines: one package per inference engine (llama_rpc, petals) behind one interface.

Code outside this package never asks which engine a cluster runs; it asks the engine's declared
capabilities. Engines never import each other."""
