"""Real datasets (bundled digits, image folders, Parquet tables) and the synthetic-set schema."""
