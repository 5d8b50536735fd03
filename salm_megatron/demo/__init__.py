"""`salm demo`: the whole stack on synthesized speech, on a laptop."""
