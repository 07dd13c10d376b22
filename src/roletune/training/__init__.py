"""The training engine: transformers.Trainer set up for roletune (trainer), with its batches, loss,
checkpoints, stopping, memory plan and distributed launch, and what a run reports as it goes."""
