"""The RWKV-4 ("v4neo") model family: everything the toolkit knows about this architecture lives here."""
