"""The bottom layer: what every stage needs, importing no other package of the project."""
