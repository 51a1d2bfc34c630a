"""Images in memory (`datasets`), the batches that feed the loop (`loaders`) and the
augmentations that pick them (`augment`)."""
