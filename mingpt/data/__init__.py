"""Data: labelled reviews from files or the embedded corpus (corpus), the two ways they become token rows
(layouts), the data directory of token files and the batches drawn from it (tokens), and whole reviews
packed into training rows (packing). `python -m mingpt.prepare` writes a data directory."""
