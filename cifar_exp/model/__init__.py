"""The network a config describes: the YAML block list (`convnet`), the CPU stand-in layers
(`fast_layers`) and what a built network costs and sees (`budget`)."""
