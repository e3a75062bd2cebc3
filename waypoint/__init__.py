"""The waypoint: the L7 proxy."""
