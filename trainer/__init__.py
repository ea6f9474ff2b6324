"""Online stage: streaming loader and the Lightning T5 trainer."""
