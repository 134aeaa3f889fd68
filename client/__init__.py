"""Client side: the speculative decoder, its drafters and the datastore client.

Importing this package stays light (numpy only); torch is imported by the modules that need it.
"""
