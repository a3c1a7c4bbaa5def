"""Agent loop, local search tools and SPAgent speculation."""
