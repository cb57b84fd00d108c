"""Files shipped inside exported sub-network checkpoints (loaded there with ``trust_remote_code``)."""
