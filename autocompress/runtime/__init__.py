"""Target runtimes' own tools on this machine (llama.cpp), found or built once."""
