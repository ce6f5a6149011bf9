"""Prices and taxes."""


def calc_total(prices, tax_rate=0.2):
    """Sum of prices plus tax, rounded to cents."""
    subtotal = sum(prices)
    return round(subtotal * (1 + tax_rate), 2)


def discount(price, percent):
    """Price after a discount of `percent` %."""
    return round(price * (100 - percent) / 100, 2)
