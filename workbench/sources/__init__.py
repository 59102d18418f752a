"""Where models and data come from: built-ins shipped offline, Hugging Face, torchvision, user code."""
