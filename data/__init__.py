"""Licensed video data: shards, license gate, decoding, buckets, loading."""
