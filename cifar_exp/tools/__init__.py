"""Commands over runs and machines: comparing runs (`report`, with `aggregate`'s statistics),
training throughput (`bench`) and the GPU check (`gpucheck`)."""
