"""The DeepSpeed trainer. It reads the pipeline's shards through ``pipeline.shards`` only; its
implementation is tracked in the trainer issue."""
