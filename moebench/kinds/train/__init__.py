"""Routers that learn: train a small MoE layer per router and record balance, collapse and
specialisation while it learns (docs/training.md). kind: the train Kind (block, rows, meta,
section, metrics); metrics: its columns with their directions; spec: the `train:` block;
tasks: data with known structure; layer: the MoE layer around a router; loop: the training
runs and their rows; measures: MaxVio, NMI, fluctuation; aggregate: the final row over seeds;
section: the report's training section."""
