"""Graph passes: analysis passes write node.meta, rewrite passes read it."""
