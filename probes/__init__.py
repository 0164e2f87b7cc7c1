"""fastprobe: batched ridge probes and neuron correlations over every layer of an activation store."""
