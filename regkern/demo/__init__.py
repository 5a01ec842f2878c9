"""`python -m regkern demo`: every pruning method on one baseline, the papers' table and figures."""
