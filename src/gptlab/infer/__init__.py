"""Using a trained model: sampling, the engine every decode goes through, the server and its page."""
