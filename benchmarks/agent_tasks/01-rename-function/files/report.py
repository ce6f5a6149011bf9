"""Prints two example totals."""

from shop import pricing
from shop.cart import Cart


def main():
    cart = Cart()
    cart.add("tea", 3.5)
    cart.add("mug", 8.0)
    print("cart:", cart.total())
    print("bulk:", pricing.calc_total([10, 20, 30], tax_rate=0.1))


if __name__ == "__main__":
    main()
