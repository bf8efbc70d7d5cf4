"""The Faust aggregator: joins query events with their interactions and emits preference pairs."""
