"""The namespace lab: clients, edges and workers as network namespaces on one machine."""
