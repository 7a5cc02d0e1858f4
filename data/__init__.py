"""Video data: decoding and sampling (video), WebDataset shards (shards, writer), the synthetic task."""
