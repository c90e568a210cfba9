"""The Gradio demo: what the kNN memory retrieves for each token."""
