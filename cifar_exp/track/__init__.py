"""What a run leaves behind: its folder's files (`record`, the one writer), plots, per-class
views, and its W&B run (`tracker`, the one module that imports wandb and TensorBoard)."""
