"""Files shipped inside exported sub-network checkpoints, loaded there with ``trust_remote_code``
(autoprune loads its own exports with the class itself, running no code from the folder)."""

#: The file that ``auto_map`` points to inside an exported per-block checkpoint, and its class.
REMOTE_MODULE = "modeling_subnet_llama"
REMOTE_CLASS = "SubnetLlamaForCausalLM"
