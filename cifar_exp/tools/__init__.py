"""Commands over runs and machines: comparing runs (`report`, with `aggregate`'s statistics and
`search`'s section on a search's study), training throughput (`bench`) and the GPU check
(`gpucheck`)."""
