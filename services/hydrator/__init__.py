"""Hydrator: fans a campaign's send request out into one RecipientQueued per recipient."""
