"""DreamBooth experts per cluster, their rendering of new prompts, target filtering and ICL shards."""
