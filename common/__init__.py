"""The data plane shared by both servers: URL -> fetch -> decode -> detect -> labels."""
