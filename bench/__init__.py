"""artifact x backend x shape -> measurements, and the report made from them."""
