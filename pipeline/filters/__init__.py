"""Crawl filters: datatrove's web heuristics, fastText language ID, book and code heuristics."""
