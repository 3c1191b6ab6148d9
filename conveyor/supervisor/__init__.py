"""The supervisor: forks worker processes per stage and keeps them alive."""
