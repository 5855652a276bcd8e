"""Making experts: chat data for training (chat_data.py), QLoRA training (train.py), merging (merge.py), and the
demo experts' data and adapters (demo/)."""
