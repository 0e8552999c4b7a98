"""SimMIM pretraining of Swin Transformer V2 on DeepSpeed."""
