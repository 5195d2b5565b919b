"""A run's files and Hugging Face's: checkpoints, opening any run or folder, conversion both ways."""
