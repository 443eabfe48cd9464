"""The API worker: its HTTP contract and edge, scoring through the runners, tasks and monitoring."""
