"""The llama.cpp RPC engine: rpc-server workers on the nodes, llama-server as the coordinator on
this machine, the llama.cpp build, RPC HELLO and version checks, and recovery of a lost worker."""
