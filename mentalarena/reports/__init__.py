"""What people read: the records report, its statistics and figures, and the figure style."""
